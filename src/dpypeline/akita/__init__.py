"""The original dpypeline's import path ``dpypeline.akita``: the code lives in
:mod:`dpypeline.legacy.akita`."""
