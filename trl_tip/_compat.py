"""Where TRL keeps GKD: `trl.experimental.gkd` since TRL 1.0, the top-level package before."""

try:
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError:  # pragma: no cover - older TRL releases
    from trl import GKDConfig, GKDTrainer

__all__ = ["GKDConfig", "GKDTrainer"]
