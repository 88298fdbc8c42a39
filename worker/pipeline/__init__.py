"""Pipeline-stage mode: each worker owns a contiguous range of layers of an ``nn.Sequential``.

Activations flow forward and δ flows backward between neighbour stages, peer to peer over
ZeroMQ; the server holds θ and applies each stage's gradients. Modules: ``schedule``
(actions as data, validator), ``partition`` (layer ranges, balancing), ``packing`` (what
crosses a boundary), ``links`` (peer sockets), ``staging`` (pinned buffers on CUDA),
``stage`` (one step's actions), ``runtime`` (the stage worker).
"""
