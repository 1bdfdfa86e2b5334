# The same composition as etc/netsvc.yaml, in Python, through netsvc's public API.
#   twistd -ny etc/netsvc.tac
import os

from twisted.application import service
from twisted.logger import ILogObserver

from netsvc import logs
from netsvc.config import DatagramListener, Limits, Listener, LogSettings, MetricsSettings, Settings, Size
from netsvc.chat.service import ChatListener
from netsvc.chat.service import Settings as ChatSettings
from netsvc.echo.service import Settings as EchoSettings
from netsvc.runtime import buildDaemon

here = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.path.abspath("etc")

settings = Settings(
    state_dir=os.path.join(here, "..", "var"),
    log=LogSettings(format="text", level="info"),
    metrics=MetricsSettings(listen=[Listener(endpoint="tcp:9100:interface=127.0.0.1")]),
    services={
        "echo": EchoSettings(
            listen=[
                DatagramListener(endpoint="tcp:7007:interface=127.0.0.1"),
                DatagramListener(endpoint="udp:7007:interface=127.0.0.1"),
                DatagramListener(endpoint="tls:7443:interface=127.0.0.1"),
                DatagramListener(endpoint="tcp6:7007:interface=::1"),
            ],
            limits=Limits(max_message=Size(65536), rate=2000, burst=4000),
        ),
        "chat": ChatSettings(
            listen=[
                ChatListener(endpoint="tcp:4041:interface=127.0.0.1"),
                ChatListener(endpoint="tcp:4040:interface=127.0.0.1", framing="nul"),
                ChatListener(endpoint="tls:4443:interface=127.0.0.1"),
            ],
        ),
    },
)

application = service.Application("netsvc")
application.setComponent(ILogObserver, logs.observerFor(settings.log))
buildDaemon(settings, configFile="etc/netsvc.tac").setServiceParent(application)
