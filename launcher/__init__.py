"""`teleport start` and `teleport demo`: run control-plane and data-plane services together.

The one package allowed to import both planes; it only composes them."""
