"""Reference resolution: choosing a manifest for a node, and explaining the choice."""
