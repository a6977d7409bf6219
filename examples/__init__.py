"""Example ReGrad QA bots (not part of the installed package). Run them as scripts from the
repository root, e.g. ``python examples/medical_bot.py``; see examples/README.md."""
