"""The ``teamgpu`` command."""

from __future__ import annotations

import click

from teamgpu import __version__
from teamgpu.cli.batch import batch_group
from teamgpu.cli.bench import bench
from teamgpu.cli.config import config_group
from teamgpu.cli.connect import connect
from teamgpu.cli.doctor import doctor
from teamgpu.cli.keys import keys_group
from teamgpu.cli.server import serve, up
from teamgpu.cli.top import top
from teamgpu.cli.usage import usage


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="teamgpu")
def main() -> None:
    """teamgpu: share one GPU server running vLLM across a team, safely and fairly."""


main.add_command(up)
main.add_command(serve)
main.add_command(keys_group)
main.add_command(config_group)
main.add_command(usage)
main.add_command(top)
main.add_command(doctor)
main.add_command(connect)
main.add_command(bench)
main.add_command(batch_group)
