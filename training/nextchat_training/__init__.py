"""Training of NExT-Chat models for nextchat_ros: synthetic tabletop data, real
data loaders, the three-stage training loop and held-out evaluation.

Imports the core (nextchat_ros); the core never imports this package.
"""
