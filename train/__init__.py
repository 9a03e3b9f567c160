"""BPS trainer: ``python train/train_bps.py --help``. Modules here are imported through the pack
(``<pack>.train.loop``); the data checks (dataset, images, demo_data, cli) need neither torch nor
ComfyUI."""
