"""Fine-tuning InfVSR on a user's footage with the paper's training recipe (`python -m infvsr_core finetune`).

- degrade.py: low-resolution inputs made on the fly (RealBasicVSR-style degradation)
- data.py: training clips, random samples, the chunk spans streaming inference uses
- losses.py: stage 1's patch-wise pixel supervision (windows decoded with context, the loss terms)
- lora.py, model.py: peft LoRA adapters and their export; the DiT made trainable (checkpointing)
- dmd.py: stage 2's cross-chunk distribution matching against the Wan2.1 T2V teacher
- checkpoint.py: the weights, the resume state and the loss curve on disk
- trainer.py: the loop (mixed precision, gradient accumulation, DDP)
- command.py: the command line

Nothing here is imported by inference: a trained LoRA is merged at load by `infvsr_core/lora.py`.
"""
