"""A preamble for ``python -c`` scripts that must run without diffcleanse: importing it fails."""

BLOCK_DIFFCLEANSE = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "diffcleanse" or name.startswith("diffcleanse."):
            raise ImportError("diffcleanse is blocked in this test")
sys.meta_path.insert(0, _Block())
"""
