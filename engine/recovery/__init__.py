"""Recovery points on the seed disk: the undo journal, its storage, failover."""

from engine.recovery.points import Point, PointNotFound, points_of, select_point
from engine.recovery.volume import LocalVolume, SeedState, SeedVolume

__all__ = ["LocalVolume", "Point", "PointNotFound", "SeedState", "SeedVolume", "points_of", "select_point"]
