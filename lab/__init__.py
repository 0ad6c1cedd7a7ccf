"""The measurement lab of the toy world: layout groups, the in-process evaluation, the multi-seed
comparison, the style row, recipe ablations, figures, building the shipped toy weights, the example
workflows' builders and the demo driver (scripts/toyworld.py runs them).

Not part of the custom-node package: the Registry archive leaves this folder out (.comfyignore), and
nothing under core/, nodes/, training/ or toyworld/ imports it.
"""
