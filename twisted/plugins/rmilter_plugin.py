from twisted.application.service import ServiceMaker

rmilter = ServiceMaker(
    "rmilter",
    "rmilter.tap",
    "Milter for Postfix/Sendmail: Rspamd, ClamAV, Redis greylisting and rate limits, DKIM signing.",
    "rmilter",
)
