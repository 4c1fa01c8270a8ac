"""Training the reference checkpoint on synthetic scenes (:mod:`tandem.data`)."""

from tandem.train.trainer import TrainSettings, TrainReport, train_model

__all__ = ["TrainSettings", "TrainReport", "train_model"]
