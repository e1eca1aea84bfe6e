"""Use cases: what the API and the training workers do. Routes call exactly one of these.

Every function takes a `Services` (the composition root's wiring) and ids or validated inputs.
`training` and `runs` import TensorFlow (through `models`); the others do not, so the API
process imports them at start and loads the ML after fork.
"""
