"""Command: prepares one dataset into TFDS ArrayRecord files.

  python -m dastc_jax.prepare --dataset=viper --manual_dir=data/Viper \\
      --data_dir=data/tfds

The work is done by ``data/datasets/prepare.py``; see the README,
"Datasets".
"""

from dastc_jax.data.datasets import prepare

if __name__ == '__main__':
  prepare.run()
