"""The optimizer and learning-rate schedule of the detector, from the ``SOLVER`` config keys."""
from det.solver.build import make_lr_scheduler, make_optimizer, set_optimizer_hyperparameters
from det.solver.lr_scheduler import solver_schedule

__all__ = ["make_lr_scheduler", "make_optimizer", "set_optimizer_hyperparameters", "solver_schedule"]
