"""The command-line apps (demo, gradient tour, CE-vs-MSE comparison): not imported by
``import jxent``; they need the ``demo`` extra (matplotlib, scikit-learn, flax)."""
