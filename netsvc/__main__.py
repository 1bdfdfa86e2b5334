from netsvc.cli import main

main()
