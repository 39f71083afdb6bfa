"""The config: YAML to frozen, validated dataclasses, and pure functions over them.

Owns: the schema and loader with located errors (schema.py), reusable value
checks (validators.py), argv placeholders such as `{fd:web}` (placeholders.py),
the reload plan (plan.py) and the generated reference (docgen.py).

May import: `upgraderd.errors`, `upgraderd.contract` (the workers' variable
names) and the standard library. Never another upgraderd package: loading a
config is the same in `check`, at start and at reload, and must not depend on
a running master.
"""
