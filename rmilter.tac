# twistd -ny rmilter.tac
#
# Runs the same service as `twistd rmilter`. Settings come from the environment:
#   RMILTER_CONFIG  path of rmilter.conf (unset: the embedded default configuration)
#   RMILTER_LISTEN  optional, space-separated listen endpoints overriding bind_socket
import os

from twisted.application import service

from rmilter.tap import make_application_service

application = service.Application("rmilter")
make_application_service(
    os.environ.get("RMILTER_CONFIG") or None,
    os.environ.get("RMILTER_LISTEN", "").split() or None,
).setServiceParent(application)
