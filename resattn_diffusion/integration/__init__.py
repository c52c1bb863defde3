"""The only layer that knows diffusers: processors and hooks, injection, the tuner file, the pipeline mixin."""
