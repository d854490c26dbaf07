"""berth-agent: the docker-like local CLI.

``entry_point`` is the console script. When the node's agent runs its CLI server
(``berth-agent serve``, started by ``berth-agent worker`` too), the command runs there,
in a process that has the agent imported already (see ``runtime_agent.cliserver``);
otherwise it runs here, in-process (``runtime_agent.cli.main.main``). Both give the same
output and exit status. This module imports as little as it can: it is on the path of
every command.
"""

import sys


def entry_point() -> int:
    from runtime_agent.cliclient import forward

    argv = sys.argv[1:]
    code = forward(argv)
    if code is not None:
        # Served: nothing of this interpreter needs tearing down (~2 ms of finalisation).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        import posix

        posix._exit(code)
    if sys.flags.no_site:  # started by the launcher (python -S): the command needs site's paths
        import site

        site.main()
    from runtime_agent.cli.main import main as run_in_process

    return run_in_process(argv)
