"""Automated canary rollouts: plan, pure state machine, controller, persistence, metrics sources."""
