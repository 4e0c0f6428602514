from shipkit.cli import main

main()
