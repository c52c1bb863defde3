"""The fuse / unfuse call orders both fusion-composition test files run (not a test file): "+res" / "+lora" load our
tuner / a LoRA, "R" / "L" fuse them, "r" / "l" unfuse them, "-res" / "-lora" unload them."""

ORDER_SCRIPTS = {
    # the six orders of the four calls
    "R L r l": "+res +lora R L r l -lora -res",
    "R L l r": "+res +lora R L l r -lora -res",
    "L R r l": "+res +lora L R r l -lora -res",
    "L R l r": "+res +lora L R l r -lora -res",
    "R r L l": "+res +lora R r L l -lora -res",
    "L l R r": "+res +lora L l R r -lora -res",
    # loading an adapter while the other is fused
    "R +lora L r l": "+res R +lora L r l -lora -res",
    "R +lora L l r": "+res R +lora L l -lora r -res",
    "L +res R r l": "+lora L +res R r l -res -lora",
    "L +res R l r": "+lora L +res R l r -res -lora",
    # unloading an adapter while fused
    "L R -res": "+res +lora L R -res l -lora",
    "R L l -res": "+res +lora R L l -res -lora",
    "R L -res -lora": "+res +lora R L -res -lora",
}

#: two of our tuners (a, b) on the same layers, with a LoRA (L) in some: "Rab" fuses both at once, "rab" unfuses both
TWO_TUNER_ORDERS = [
    "Ra Rb ra rb",
    "Ra Rb rb ra",
    "Rb Ra ra rb",
    "Ra ra Rb rb",
    "Rab ra rb",
    "Ra Rb rab",
    "Ra L Rb ra l rb",
    "L Ra Rb l rb ra",
    "Ra L Rb rab l",
]

FUSION_TARGETS = ["attn1", "attn2", "ff"]
#: every tuner that fuses, at small sizes
FUSIBLE_TUNERS = {
    "res_lora": dict(tuner="res_lora", rank=2),
    "res_lora_sequential": dict(tuner="res_lora", rank=2, placement="sequential"),
    # every support term, W0 ⊙ A and W0 C included, and a bias created on the bias-free to_q/to_k/to_v
    "glora": dict(tuner="glora", config="A=lora2,B=lora2,C=lora2,D=vector,E=vector"),
    "surm_circulant": dict(tuner="surm_circulant"),
    "surm_toeplitz": dict(tuner="surm_toeplitz"),
    "surm_kronecker": dict(tuner="surm_kronecker"),
    "surm_ldr": dict(tuner="surm_ldr", displacement_rank=2),
}
