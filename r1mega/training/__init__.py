"""Policy training machinery: model setup, megatron schedules, losses, optimizer."""
