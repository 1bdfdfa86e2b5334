# The same composition as etc/netsvc.yaml, in Python, through netsvc's public API.
#   twistd -ny etc/netsvc.tac
import os

from twisted.application import service
from twisted.logger import ILogObserver

from netsvc import logs
from netsvc.auth import UserSource
from netsvc.chat.service import ChatListener
from netsvc.chat.service import Settings as ChatSettings
from netsvc.config import DatagramListener, Limits, Listener, LogSettings, MetricsSettings, Settings, Size
from netsvc.dns.service import Record
from netsvc.dns.service import Settings as DNSSettings
from netsvc.echo.service import Settings as EchoSettings
from netsvc.forward.settings import ForwardListener, Health, Rule, UDPSettings
from netsvc.forward.settings import Settings as ForwardSettings
from netsvc.ldap.settings import Settings as LDAPSettings
from netsvc.runtime import buildDaemon
from netsvc.smtp.settings import RelaySettings, SMTPListener
from netsvc.smtp.settings import Settings as SMTPSettings
from netsvc.web.service import Settings as WebSettings
from netsvc.web.settings import AccessLogSettings, WebListener

here = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.path.abspath("etc")

settings = Settings(
    base_dir=here,  # relative paths below (ldif, users) resolve here, as in etc/netsvc.yaml
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
        "forward": ForwardSettings(
            rules=[
                Rule(name="echo", listen=[ForwardListener(endpoint="tcp:7008:interface=127.0.0.1")],
                     connect=["tcp:host=127.0.0.1:port=7007"], allow=["127.0.0.0/8", "::1/128"],
                     health=Health(interval=10, fall=3, rise=2)),
                Rule(name="echo-udp", listen=[ForwardListener(endpoint="udp:7008:interface=127.0.0.1")],
                     connect=["udp:host=127.0.0.1:port=7007"], udp=UDPSettings(idle_timeout=30)),
            ],
        ),
        "chat": ChatSettings(
            listen=[
                ChatListener(endpoint="tcp:4041:interface=127.0.0.1"),
                ChatListener(endpoint="tcp:4040:interface=127.0.0.1", framing="nul"),
                ChatListener(endpoint="tls:4443:interface=127.0.0.1"),
            ],
        ),
        "web": WebSettings(
            listen=[
                WebListener(endpoint="tls:8443:interface=127.0.0.1"),
                WebListener(endpoint="tcp:8080:interface=127.0.0.1", redirect_to_https=True),
            ],
            root=os.path.join(here, "..", "www"),
            access_log=AccessLogSettings(file=os.path.join(here, "..", "var", "web-access.log")),
        ),
        "dns": DNSSettings(
            listen=[
                DatagramListener(endpoint="udp:5353:interface=127.0.0.1"),
                DatagramListener(endpoint="tcp:5353:interface=127.0.0.1"),
                DatagramListener(endpoint="tls:8853:interface=127.0.0.1"),
            ],
            hosts=["/etc/hosts"],
            records=[
                Record(name="printer.lab", type="A", value="10.0.0.7", ttl=300),
                Record(name="lab", type="MX", value="10 mail.lab"),
                Record(name="mail.lab", type="A", value="10.0.0.8"),
            ],
            allow=["127.0.0.0/8", "::1/128"],
        ),
        "ldap": LDAPSettings(
            listen=[
                Listener(endpoint="tcp:3389:interface=127.0.0.1"),
                Listener(endpoint="tls:3636:interface=127.0.0.1"),
            ],
            suffix="dc=example,dc=com",
            ldif=["ldap/example.ldif"],
            anonymous="read",
        ),
        "smtp": SMTPSettings(
            listen=[
                SMTPListener(endpoint="tcp:2525:interface=127.0.0.1"),
                SMTPListener(endpoint="tcp:2587:interface=127.0.0.1", submission=True),
                SMTPListener(endpoint="tls:2465:interface=127.0.0.1", submission=True),
            ],
            hostname="mail.lab",
            mynetworks=["127.0.0.0/8", "::1/128"],
            users=UserSource(file="mail-users.txt"),
            relay=RelaySettings(capture=True, keep=10000),
        ),
    },
)

application = service.Application("netsvc")
application.setComponent(ILogObserver, logs.observerFor(settings.log))
buildDaemon(settings, configFile="etc/netsvc.tac").setServiceParent(application)
