"""Training presets: ``<name>.yaml`` files read by `layout2image.trainer.config.load_config` (``l2i-train --preset``).

This file makes the folder a package so the YAML files ship in wheels (package data ``*.yaml``).
"""
