"""``govctl``: the admin CLI for reviewers and operators (held tasks, usage, audit, policy)."""
