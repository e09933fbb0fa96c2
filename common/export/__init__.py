"""Policy export (a tool a user runs, not imported by algorithm files or the core of common/).

    python -m common.export RUN --format torchscript     # RUN/policy.pt: load with torch.jit.load alone
    python -m common.export RUN --format onnx            # RUN/policy.onnx: load with onnxruntime alone

policy.py   the exported graph (raw observation -> normaliser -> the agent's deterministic policy -> action
            bounds), the checks against load_policy, and the command line
"""
