"""Target sets shared by the model and generation tests: every subset of the three modulation targets."""

TARGET_SETS = [
    [],
    ["temperature"],
    ["gain"],
    ["activation"],
    ["temperature", "gain"],
    ["temperature", "activation"],
    ["gain", "activation"],
    ["temperature", "gain", "activation"],
]
ALL = ["temperature", "gain", "activation"]
