"""The local dataset builder (a tool a user runs, not imported by algorithm files).

    python -m common.build pendulum            # D4RL's recipe on any Gymnasium env: see recipe.py

recipe.py        the D4RL recipe: train a behaviour agent online, pick random/medium/expert checkpoints,
                 roll them out, write Minari datasets local/<name>/<quality>-v0
behavior_sac.py  the online SAC behaviour agent (Box actions)
behavior_dqn.py  the online Double DQN behaviour agent (Discrete actions)
scripted.py      presets with a scripted expert instead of an agent (fork: python -m common.build fork)
"""
