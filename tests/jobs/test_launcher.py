"""`lorafa-scale launch`: gradient accumulation arithmetic, Slurm host lists, and the job it writes (or, with
--dry-run, only prints)."""

import shlex
import shutil
import subprocess

import pytest

from lorafa_scale import ConfigError
from lorafa_scale.jobs.hostlist import expand_nodelist
from lorafa_scale.jobs.launcher import REPO_ROOT, gradient_accumulation, main, parse_sbatch_options
from tests.tiny_models import tiny_llama_config

TRAIN = str(REPO_ROOT / "launch" / "train.py")


@pytest.mark.parametrize("global_batch, micro, nodes, gpus, accum", [
    (128, 4, 2, 8, 2), (512, 1, 8, 8, 8), (64, 1, 8, 8, 1), (96, 3, 4, 2, 4),
])
def test_gradient_accumulation(global_batch, micro, nodes, gpus, accum):
    assert gradient_accumulation(global_batch, micro, nodes, gpus) == accum
    assert accum * micro * nodes * gpus == global_batch


@pytest.mark.parametrize("args, message", [
    ((500, 1, 8, 8), "global batch 500 is not a multiple of micro batch 1 x 8 nodes x 8 GPUs per node = 64; "
                     "use a global batch of 448 or 512"),
    ((32, 4, 2, 8), "global batch 32 is not a multiple of micro batch 4 x 2 nodes x 8 GPUs per node = 64; "
                    "use a global batch of 64,"),
    ((128, 0, 2, 8), "micro batch must be a positive integer, got 0"),
    ((128, 4, 2, True), "GPUs per node must be a positive integer, got True"),
])
def test_gradient_accumulation_errors_name_the_numbers(args, message):
    with pytest.raises(ConfigError) as err:
        gradient_accumulation(*args)
    assert message in str(err.value)


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("node-[8-10]", ["node-8", "node-9", "node-10"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("a,b", ["a", "b"]),
    ("solo", ["solo"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[3-1]", "gpu[01-", "gpu[a-b]", ""])
def test_expand_nodelist_rejects_malformed_lists(nodelist):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(nodelist)


LAUNCH_13B = ["--preset", "llama-2-13b", "--nodes", "2", "--gpus-per-node", "8", "--global-batch-size", "128",
              "--fsdp", "--nodelist", "gpu[07-08]", "--partition", "a100"]


def test_dry_run_prints_the_job_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*LAUNCH_13B, "--dry-run", "--", "--dataset", "data.jsonl"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert "gradient accumulation = global 128 / (micro 4 x 2 nodes x 8 GPUs) = 2" in out
    assert "LoRA-FA r=48 alpha=96 fast_adapter_rank=48" in out
    assert "fits in 80 GiB per GPU" in out  # the planner's memory per GPU
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("torchrun")]
    for node, command in enumerate(commands):
        assert command[:11] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", str(node),
                                "--master-addr", "gpu07", "--master-port", "29500"]
        assert command[command.index(TRAIN) + 1:] == [
            "--fsdp", "--model", "meta-llama/Llama-2-13b-hf", "--output-dir", "runs/llama-2-13b",
            "--micro-batch-size", "4", "--global-batch-size", "128", "--seq-len", "4096", "--r", "48",
            "--lora-alpha", "96", "--fast-adapter-rank", "48", "--lora-dropout", "0.05", "--target-modules", "all-linear",
            "--gradient-checkpointing", "--dataset", "data.jsonl"]
    assert len(commands) == 2


def test_small_models_default_to_zero2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "llama-3.2-1b", "--nodes", "2", "--global-batch-size", "64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"export LORAFA_DS_CONFIG={REPO_ROOT}/ds_configs/zero2.json" in out
    assert "meta-llama/Llama-3.2-1B: zero2, 2 node(s) x 8 GPU(s), micro batch 4 x 4096" in out
    assert f"{TRAIN} --config {REPO_ROOT}/ds_configs/zero2.json --model meta-llama/Llama-3.2-1B" in out


def test_training_options_are_passed_literally_never_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hostile = "x\n$(touch pwned)`touch pwned2`"
    assert main([*LAUNCH_13B, "--output-dir", "out", "--", "--dataset", hostile]) == 0
    text = (tmp_path / "out" / "slurm" / "job.sbatch").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing ran while rendering
    written_by = [line for line in text.splitlines() if line.startswith("# Written by")]
    assert len(written_by) == 1 and "touch pwned2" in written_by[0]  # one comment line, not two
    assert subprocess.run(["bash", "-n", "-c", text]).returncode == 0


def test_written_job_is_a_valid_sbatch_script_and_is_not_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--preset", "llama-3-70b", "--nodes", "8", "--global-batch-size", "512", "--time", "2-00:00:00",
            "--output-dir", "out", "--master-port", "31001", "--warning-seconds", "900"]
    assert main(args) == 0
    job = tmp_path / "out" / "slurm" / "job.sbatch"
    text = job.read_text()
    options = parse_sbatch_options(text)
    keys = ("nodes", "gpus-per-node", "ntasks-per-node", "time", "chdir", "output", "signal")
    assert {k: options[k] for k in keys} == {
        "nodes": "8", "gpus-per-node": "8", "ntasks-per-node": "1", "time": "2-00:00:00", "chdir": str(tmp_path),
        "output": f"{tmp_path}/out/slurm/%x-%j.out", "signal": "B:USR1@900"}
    assert "export SHUTDOWN_TIMEOUT=900" in text  # torchrun gives the workers as long to checkpoint
    assert not any("$" in line for line in text.splitlines() if line.startswith("#SBATCH"))
    assert f"export LORAFA_DS_CONFIG={REPO_ROOT}/ds_configs/zero3.json" in text
    assert "Meta-Llama-3-70B: zero3, 8 node(s) x 8 GPU(s), micro batch 2 x 4096" in capsys.readouterr().out
    assert "export MASTER_PORT=31001" in text and "--r 64 --lora-alpha 128 --fast-adapter-rank 64" in text
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", str(job)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout

    capsys.readouterr()
    assert main(args) == 0  # the same command again (README commands run twice): its own job, left as it is
    assert "already holds this job, unchanged; submit with: sbatch" in capsys.readouterr().out
    assert job.read_text() == text
    assert main([*args, "--r", "8"]) == 2  # another job: the one written stays as it was
    assert f"{job.relative_to(tmp_path)} holds another job; pass --overwrite" in capsys.readouterr().err
    assert job.read_text() == text
    assert main([*args, "--r", "8", "--overwrite"]) == 0
    assert "--r 8 --lora-alpha 16 --fast-adapter-rank 8" in job.read_text()


def test_a_local_model_folder_instead_of_a_preset(tmp_path, monkeypatch, capsys):
    tiny_llama_config().save_pretrained(tmp_path / "my-llama")  # config.json only: no weights needed
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "my-llama", "--nodes", "2", "--gpus-per-node", "1", "--global-batch-size", "32",
                 "--fsdp", "--seq-len", "128", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "my-llama" in out and "LoRA-FA r=16 alpha=32 fast_adapter_rank=16" in out  # the < 1B row
    assert f"--model {tmp_path / 'my-llama'} --output-dir runs/my-llama --micro-batch-size 8" in out
    assert main(["--preset", "llama-2-14b", "--nodes", "2", "--global-batch-size", "32", "--dry-run"]) == 2
    assert "--preset: 'llama-2-14b' is neither a preset" in capsys.readouterr().err


@pytest.mark.parametrize("changes, message", [
    (["--global-batch-size", "100"], "global batch 100 is not a multiple of micro batch 4 x 2 nodes x 8 GPUs per node = 64"),
    (["--nodelist", "gpu[1-3]"], "--nodelist gpu[1-3] names 3 nodes, --nodes is 2"),
    (["--partition", "a100 long"], "#SBATCH --partition=a100 long: Slurm takes these values literally"),
    (["--seq-len", "8192"], "seq_len=8192 exceeds the model's max_position_embeddings=4096"),
    (["--no-fsdp", "--config", "missing.json"], "--config: missing.json not found"),
    # the trainer's options are checked by the trainer's own parser before anything is written
    (["--", "--datset", "d.jsonl"], "options after -- (for launch/train.py): unknown option --datset; did you mean --dataset?"),
    (["--", "--dataset", "d.jsonl", "--dry-run"], "(--dry-run is an option of lorafa-scale launch: put it before --)"),
    (["--", "--lr", "fast"], "options after -- (for launch/train.py): argument --lr: invalid float value: 'fast'"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, monkeypatch, capsys, changes, message):
    monkeypatch.chdir(tmp_path)
    args = ["--preset", "llama-2-13b", "--nodes", "2", "--global-batch-size", "128", "--fsdp", *changes]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_old_option_names_still_work_with_a_one_line_note(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    new = ["--preset", "llama-2-13b", "--nodes", "2", "--global-batch-size", "128", "--micro-batch-size", "2",
           "--fsdp", "--dry-run"]
    old = ["--preset", "llama-2-13b", "--nodes", "2", "--global-batch", "128", "--micro-batch", "2",
           "--strategy", "fsdp", "--dry-run"]
    assert main(new) == 0
    expected = capsys.readouterr()
    assert main(old) == 0
    got = capsys.readouterr()
    assert got.out.replace(" ".join(old), " ".join(new)) == expected.out
    assert got.err.splitlines() == [
        "lorafa-scale launch: note: --global-batch is deprecated, use --global-batch-size (still accepted in this release)",
        "lorafa-scale launch: note: --micro-batch is deprecated, use --micro-batch-size (still accepted in this release)",
        "lorafa-scale launch: note: --strategy is deprecated, use --fsdp or --no-fsdp (still accepted in this release)"]
