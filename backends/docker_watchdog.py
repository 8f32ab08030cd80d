"""Stop a stage's container when its launcher dies: the docker backend's orphan guard.

A container started through the SDK runs on in the engine when the launcher is killed
outright (``kill -9`` of make's group, a closed ssh session): a trainer nobody watches,
writing checkpoints that a rerun would fight over. ``docker_backend.run_container`` starts
this watchdog for each container, in a session of its own (so a signal to the launcher's
group does not reach it) and holding the read end of a pipe whose write end only the
launcher has. When the launcher ends, however it ends, the pipe closes; the watchdog then
stops the container (SIGTERM, the stage's grace period to save) and removes it. After a
normal end the launcher has removed the container already, and the watchdog finds nothing.

    python -m backends.docker_watchdog CONTAINER_NAME STOP_TIMEOUT_S   # stdin: the pipe
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    name, timeout = argv[0], int(argv[1])
    try:
        while os.read(0, 4096):  # the launcher never writes: this waits for its end
            pass
    except OSError:
        pass
    import docker

    try:
        container = docker.from_env().containers.get(name)
    except docker.errors.NotFound:
        return 0  # the launcher removed it: a normal end
    except docker.errors.DockerException:
        return 0  # no engine to ask (it went, or never ran the container): nothing to stop
    try:  # the launcher's terminal or pipe may be gone with it: never let that stop us
        print(
            f"[nanochat] docker: the launcher of {name} is gone; stopping it ({timeout} s to save)",
            file=sys.stderr,
            flush=True,
        )
    except OSError:
        pass
    try:
        container.stop(timeout=timeout)
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError:  # removal already under way (docker run --rm): done
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
