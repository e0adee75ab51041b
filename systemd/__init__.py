"""Service-manager files (data only): systemd user units and the launchd agent plist.

Installed as ``stigmer.broker.units``; ``stigmer-broker service install`` fills in
``@EXEC@`` (the console script) and ``@HOME@`` (the broker's home).
"""
