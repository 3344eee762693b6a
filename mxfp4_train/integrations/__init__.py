"""Adapters that let RL frameworks train MXFP4 learners and sync them into a vLLM engine serving mxfp4_rl.

Each adapter lives in its own module and imports its framework only when imported itself, so
`import mxfp4_train` never pulls in an RL framework:
- `mxfp4_train.integrations.trl_grpo`: TRL's GRPOTrainer (docs/frameworks.md).
"""
