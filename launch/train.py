"""Train LoRA-FA adapters. With no options: the built-in model on the shipped sample dataset (CPU, ~1 min).

    python launch/train.py [options]
    deepspeed --num_gpus N launch/train.py --config ds_configs/zero3.json --model DIR --dataset FILE
    torchrun --nproc_per_node N -- launch/train.py --fsdp --model DIR --dataset FILE   # "--": torchrun would
                                    # otherwise read the trainer's --r as an abbreviation of its own options

All options: python launch/train.py --help. The logic lives in lorafa_scale/training/loop.py.
"""

import sys

from lorafa_scale.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
