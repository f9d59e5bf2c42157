"""Graph transforms that build new graphs rather than optimise one: autodiff (the backward graph from the
op table's gate rules), copies (fan-out copy gates) and training (forward + backward + optimizer update).
compile() runs them before the pipeline passes."""
