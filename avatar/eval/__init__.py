"""Oracle metrics: lip sync, PSNR/SSIM in still-head mode, identity drift and flicker."""
