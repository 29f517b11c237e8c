"""The policy file's model: tiers, accounts, defaults, elastic rules.

Pure code: no I/O beyond parsing the text handed in. See ``api.py``.
"""
