"""The tiny probe run the CPU tests share (probe, blocks, shards)."""

# vit_tiny at 32 px: 4 patches + [cls]; 24 train images, 3 optimizer steps of 8 per epoch. On the CPU (fp32)
# also where CUDA is present: the equivalences below are CPU ones ("auto" would be bf16 on CUDA).
TINY = dict(model="vit_tiny_patch16_224", img_size=32, epochs=3, warmup_epochs=1, batch_size=4, effective_batch=8,
            num_workers=0, progress=False, heads="cls,mean,abmilp", lrs="0.1,1.0", device="cpu")
