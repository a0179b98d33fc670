"""Measuring quality: an upscaled video against its reference, streamed, into a JSON summary, a CSV and a plot.

    sources.py  the two videos side by side in chunks, after checking they correspond (size, length, rate)
    metrics.py  PSNR (RGB, Y) and SSIM per frame (scikit-image), and the table of every metric's meaning
    flow.py     E*warp (OpenCV DIS flow, occlusion-masked) and TecoGAN's tOF (Farneback), streamed
    semantic.py VBench's subject / background consistency from local DINO / CLIP weights (never downloaded)
    perceptual.py LPIPS (AlexNet, VGG16) and DISTS from local torchvision backbone files (never downloaded)
    run.py      one evaluation: the streaming loop, scene cuts from the content detector
    report.py   summary.json, frames.csv, plot.png, each written whole or not at all
    degrade.py  --make-lr: the 4x bicubic antialiased protocol that makes low-resolution test inputs
    suite.py    --suite: every clip of a test set (GT/ and output/ folders), one table
    command.py  the `evaluate` command (its parser imports nothing heavy)

Nothing is imported here, so that the command line's parser stays light: import the modules themselves.
"""
