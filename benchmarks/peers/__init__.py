"""The comparison baselines as training providers: peft LoRA / GLoRA / C3A adapters and full UNet fine-tuning.

They train through the library's one training core (:func:`resattn_diffusion.training.train`) as
:class:`~resattn_diffusion.training.trainable.TrainableProvider` implementations, so a comparison differs only in
what trains. The library knows nothing of them.

* :mod:`.trainables`: the providers, and the loader that puts any saved result back on a base UNet;
* :mod:`.train`: the training scripts' command line plus ``--peft_method`` / ``--full_finetune``, and the
  ``train_stats.json`` the benchmarks read::

      python -m benchmarks.peers.train dreambooth --peft_method lora --peft_rank 4 <train_dreambooth.py flags>
"""
