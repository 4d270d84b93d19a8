from gaborprune.cli import main

main()
