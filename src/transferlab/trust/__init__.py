"""Answers you can trust, fitted on the run's held-out validation split (never on the test split):

- :mod:`.calibration`: temperature scaling, so that a probability of 0.9 is right about 9 times in 10;
- :mod:`.unknown`: a score for images unlike the training data (distance to the nearest training features)
  and a threshold that keeps a chosen share of known images;
- :mod:`.conformal`: split-conformal prediction sets that contain the true class with a chosen probability;
- :mod:`.model`: the three together (:class:`~.model.Trust`), as stored in a run and applied by ``predict``,
  ``evaluate``, the exported model and the web app.

numpy only: the torch-free ``predict`` applies them too.
"""
