"""Stage 3: fuse graph and text vectors, build the coarse-to-fine semantic hierarchy."""

from kgtok.hierarchy.build import SemanticHierarchy, fuse, level_counts
from kgtok.hierarchy.config import HierarchyConfig
from kgtok.hierarchy.stage import load_hierarchy, run_hierarchy

__all__ = ["HierarchyConfig", "SemanticHierarchy", "fuse", "level_counts", "load_hierarchy", "run_hierarchy"]
