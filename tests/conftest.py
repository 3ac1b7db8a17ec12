import os

# Eight fake CPU devices for the sharded tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
