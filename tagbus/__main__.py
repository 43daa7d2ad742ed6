from tagbus.cli import main

main()
