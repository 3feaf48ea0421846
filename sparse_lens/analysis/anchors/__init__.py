"""The thought-anchor implementation, one step of the method per module (``sentences`` ->
``dense``, ``sparse`` -> ``salience`` -> ``agreement``, ``chain_of_thought``). The public entry point
is ``sparse_lens.analysis.thought_anchors``, which describes the method and re-exports every
public name."""
