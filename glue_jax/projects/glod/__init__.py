"""GLoD: training-free composition of global and local conditions at sampling time.

The composition math is shared core (``glue_jax.sampling.compose``); this
package holds what tests the paper's claims on CPU: the procedural scenes
data (``scene_data``), the prompt-conditioned generator pipeline
(``scenes_pipeline``, trained by the one trainer), the probes that read
colour, shape and layout off generated images (``probes``), the composition
evaluation (``composition_eval``) and its CLI (``composition_cli``); and GLoD
on class-conditional ImageNet checkpoints (``class_composition``: a global
class with local classes in boxes).
"""
