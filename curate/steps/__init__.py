"""Steps added through the protocol alone (curate.pipeline.steps): each module declares its Step(s); no executor
names them."""
