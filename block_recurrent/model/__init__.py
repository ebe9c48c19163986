"""The network: config, carried state, positions, attention, memory, the recurrent cell, layers and the model.

Imports nothing from the rest of the package."""
